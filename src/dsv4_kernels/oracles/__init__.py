"""Independent fp64 oracles used by tests and the verification ladder to check the references."""
