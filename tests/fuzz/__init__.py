"""A seeded fuzz suite for the DICOM boundary of ``sarcnode serve`` (issue 13, item 10).

- :mod:`tests.fuzz.dimse`: a raw DICOM upper-layer client, so that any byte of a
  command, a data set or a PDU can be what the fuzz wants (pynetdicom's SCU
  validates what it sends), and associations are reused where a class allows;
- :mod:`tests.fuzz.generator`: the hostile-input generator, one seeded stream
  per class, each input with the status class it must be answered with;
- :mod:`tests.fuzz.harness`: a real ``sarcnode serve`` on loopback, the runner,
  and the checks made after each class (alive, statuses, nothing outside the
  root, no orphans, audit chain, RSS, PHI in the log).

``tests/fuzz/test_fuzz.py`` runs a bounded campaign in ``make test``;
``bench/fuzz.py`` runs a long one and prints its figures.
"""
