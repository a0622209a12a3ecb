"""The seeded hostile-input generator: one stream of cases per attack class.

Every case says what it sends and which outcomes are right for it
(:attr:`StoreCase.expect`): a C-STORE status, :data:`~tests.fuzz.dimse.ABORT`
(the node ends the association without an answer: what a protocol violation
gets), :data:`~tests.fuzz.dimse.REJECT` (A-ASSOCIATE-RJ) or
:data:`~tests.fuzz.dimse.CLOSED` (the fuzz closed the connection itself).
0x0110 (our own fault) and :data:`~tests.fuzz.dimse.TIMEOUT` (a request left
unanswered) are never right. The classes and what they must get:

==================  ===================================================================
class               expected
==================  ===================================================================
truncated           0xC000: a real or synthetic data set cut before its Pixel Data ends
random_bytes        0xC000 (0xA900 when a valid prefix leads): random bytes as data set
hostile_uids        0xC000 (path, letters, control characters, > 64 characters, empty
                    components in a Study/Series/SOP Instance UID; 0xA900 too where
                    pydicom reads the command's value otherwise), 0x0122 or abort for
                    an unknown SOP class (pynetdicom has no service to hand it to),
                    0xA900 (command and data set differ), abort (a command UID over 64
                    characters: pynetdicom cannot decode it); 0x0000 for the tolerated
huge_lengths        0xC000 (a length past the end, an undefined length where none may
                    be), 0xA700 (over a million elements)
deep_nesting        0xC000 past 32 levels of sequences; 0x0000 for the controls within
corrupt_deflate     0xC000 (truncated, wrapped, random stream), 0x0000 (trailing bytes,
                    stored blocks), any of 0x0000/0xC000/0xA900 for flipped bits
deflate_bomb        0xA700: zero Pixel Data or a private OB inflating 17 MiB - 1 GiB
mutation            0x0000, 0xC000 or 0xA900: structure-aware mutations of real MR
                    files (and the synthetic ones) - never 0x0110, never no answer
odd_files           0x0122 for non-MR SOP classes; 0x0000/0xC000/0xA900 for MR ones
foreign_objects     0x0122 (CT, PDF, RT Plan or another MR class on a context),
                    0xA900 (a CT data set under an MR command), abort (a rejected or
                    unknown context ID)
foreign_series      0x0000 then 0xC000: a Series Instance UID reused under another study
duplicates          0x0000, 0x0000 again (same content), 0xB006 (other content, first kept)
phi_planted         0x0000 (PHI in patient, text, IS and private elements), 0xC000 /
                    0xA900 (PHI in UIDs or US elements): the log is then searched for it
ae_titles           reject (unknown calling or called AE title), or abort where
                    pynetdicom cannot decode the title (control characters, backslash,
                    non-ASCII, blank); FUZZER with trailing white space is FUZZER
command             0xC000 (no or empty SOP Instance/Class UID, no data set), abort
                    (undecodable command set: random, cut inside an element header
                    or value, an element longer than the set, over 64 KiB; no
                    Message ID, unknown command field); 0x0000 without Priority
                    (pynetdicom assumes Low)
network             abort: raw-socket attacks (huge PDU lengths, unknown PDU types,
                    random bytes, drips, idle, PDUs out of order, a data set
                    fragment before its command, a command fragment inside a data
                    set); closed for the connections the fuzz itself closes (also
                    mid-data-set)
oversize            abort: a data set over storage.max_dataset_mb, while it arrives
==================  ===================================================================

The stream of a class depends only on the seed, the class and the number of
inputs asked for (``random.Random(f"{seed}:{class}")``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from random import Random

from tests.fuzz.cases import Case
from tests.fuzz.corpus import Corpus
from tests.fuzz.datasets import (
    corrupt_deflate,
    deep_nesting,
    deflate_bomb,
    duplicates,
    foreign_objects,
    foreign_series,
    hostile_uids,
    huge_lengths,
    odd_files,
    phi_planted,
    random_bytes,
    truncated,
)
from tests.fuzz.mutate import mutation
from tests.fuzz.protocol import ae_titles, command, network, oversize

Generator = Callable[[Random, Corpus, int], Iterator[Case]]

CLASSES: dict[str, tuple[Generator, float]] = {
    "truncated": (truncated, 10),
    "random_bytes": (random_bytes, 8),
    "hostile_uids": (hostile_uids, 8),
    "huge_lengths": (huge_lengths, 8),
    "deep_nesting": (deep_nesting, 6),
    "corrupt_deflate": (corrupt_deflate, 7),
    "deflate_bomb": (deflate_bomb, 3),
    "mutation": (mutation, 20),
    "odd_files": (odd_files, 6),
    "foreign_objects": (foreign_objects, 5),
    "foreign_series": (foreign_series, 5),
    "duplicates": (duplicates, 5),
    "phi_planted": (phi_planted, 8),
    "ae_titles": (ae_titles, 2),
    "command": (command, 3),
    "network": (network, 1.2),
    "oversize": (oversize, 0.3),
}


def counts_for(total: int) -> dict[str, int]:
    """Inputs per class for a run of about ``total`` inputs (each class at least 1)."""
    weight = sum(w for _, w in CLASSES.values())
    return {name: max(1, round(total * w / weight)) for name, (_, w) in CLASSES.items()}


def generate(name: str, seed: int, n: int, corpus: Corpus) -> Iterator[Case]:
    """The ``n`` cases of class ``name`` for ``seed``."""
    gen, _ = CLASSES[name]
    return gen(Random(f"{seed}:{name}"), corpus, n)


__all__ = ["CLASSES", "counts_for", "generate"]
