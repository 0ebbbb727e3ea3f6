"""shears: sparse base models + elastic-LoRA super-networks + Pareto-front adapters on stock PEFT."""

__version__ = "0.1.0"
