"""Drop-ins for the protocols of the frameworks people run PRMs from, each on prmserve's public API."""
