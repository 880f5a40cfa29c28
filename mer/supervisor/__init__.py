"""The supervisor of `mer serve`: spawns the actors, restarts them, speaks to systemd."""
