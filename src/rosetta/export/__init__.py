"""Export to optimised inference engines."""
