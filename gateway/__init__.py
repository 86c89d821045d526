"""joulegate: an OpenAI-compatible gateway that routes by difficulty inside joule budgets."""
