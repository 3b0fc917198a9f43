"""From a finished run to a model others can load: pairing, merge, card, push."""
