"""Model-card template (``modelcard_template.md``, Jinja) and per-model metadata (``models.json``)
that ``timm_vib.hub`` builds the Hugging Face Hub cards from."""
