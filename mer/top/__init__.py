"""`mer top`: a terminal dashboard of a running service.

`monitor`: the figures, from the service's public endpoints; `app`: the textual screen."""
