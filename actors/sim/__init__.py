"""The simulated users: hidden response model, population, traffic."""
