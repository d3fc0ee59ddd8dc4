"""The transport-free engine: domain types, commit rules and the error tree."""
