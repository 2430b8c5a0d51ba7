"""Utilities below every other package (they import no other part of ddfnet but ``cli``): atomic writes and
results files (``io``), reading weights files (``weights``), benchmark helpers (``bench``)."""
