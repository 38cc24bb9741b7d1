"""One dispatch point per op: validate inputs, pick the backend, call it."""
