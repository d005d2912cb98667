"""The bundled small PRM: its checkpoint (small-prm/), the generators of its training and test data, and the demo."""
