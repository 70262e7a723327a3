"""Model loading, profiles, noise bank and text encoding."""
