"""Models made elsewhere, converted into rosetta model directories."""
