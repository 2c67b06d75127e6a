"""convpeft: parameter-efficient fine-tuning for edge CNNs, and what each update really costs."""

__version__ = "0.1.0"
