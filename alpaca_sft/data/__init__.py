"""Records in, supervised token rows out: reading, checking, templating, tokenizing."""
