"""Array operations shared by models and optimisers (a leaf: imports nothing from sdl)."""
