"""refusal-lens: study how chat language models refuse."""

__version__ = "0.1.0"
