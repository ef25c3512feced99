"""mode: Mixture of Dyadic Experts and its baselines for multi-task PEFT on Super-NaturalInstructions."""

__version__ = "0.1.0"
