"""Conversations as users have them (schema), any HF Jinja chat template compiled into labelled
spans (jinja), and where templates are read from (sources)."""
