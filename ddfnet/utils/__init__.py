"""Utilities below every other package (they import no other part of ddfnet but ``cli``): atomic writes,
output-file checks and results files (``io``), loading weights (``weights``), the scripts' ``--device``
(``device``)."""
