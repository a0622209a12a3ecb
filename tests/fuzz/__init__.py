"""A seeded fuzz suite for the DICOM boundary of ``sarcnode serve`` (issue 13, item 10).

- :mod:`tests.fuzz.dimse`: a raw DICOM upper-layer client, so that any byte of a
  command, a data set or a PDU can be what the fuzz wants (pynetdicom's SCU
  validates what it sends), and associations are reused where a class allows;
- :mod:`tests.fuzz.corpus`: the data sets inputs derive from (synthetic, the real
  MR files, pydicom's odd test files) as element lists, refilled per input with
  fresh UIDs and planted patient values;
- :mod:`tests.fuzz.cases`: what a case is and the outcomes it may get;
  :mod:`tests.fuzz.datasets`, :mod:`tests.fuzz.mutate` and
  :mod:`tests.fuzz.protocol`: the generators of each class;
  :mod:`tests.fuzz.generator`: the classes, their weights and seeded streams;
- :mod:`tests.fuzz.harness`: a real ``sarcnode serve`` on loopback, the runner,
  and the checks made after each class (alive, statuses, nothing outside the
  root, no orphans, audit chain, RSS, PHI and control characters in the log).

``tests/fuzz/test_fuzz.py`` runs a bounded campaign in ``make test``;
``bench/fuzz.py`` runs a long one and prints its figures.
"""
