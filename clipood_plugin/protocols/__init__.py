"""CLIPood's evaluation protocols as pure split rules: which image goes to which split.

Nothing here decodes an image or trains anything. A protocol takes :class:`ImageRecord` lists
(from listing a folder tree, from the embedded synthetic world, or built by hand) and returns a
:class:`Split`: named record lists plus the class names each list is classified among. The
recipes, the embedded world and the tests all go through these rules, so a real dataset and the
synthetic one are split the same way.

Protocols (docs/official_code.md §4.3, §4.4):

- :mod:`~clipood_plugin.protocols.domainbed`: leave-one-domain-out with DomainBed's 80/20
  holdout (``seed_hash``, ``split_dataset``) and balanced per-domain batches.
- :mod:`~clipood_plugin.protocols.base_to_new`: CoOp/CoCoOp base-to-new, 16 shots, ⌈K/2⌉ base.
- :mod:`~clipood_plugin.protocols.in_the_wild`: OfficeHome/DomainNet with ⌊K/2⌋ base classes and
  K-way evaluation on the whole target domain.
- :mod:`~clipood_plugin.protocols.imagenet`: 16-shot ImageNet → V2, Sketch (1000-way), A, R
  (200-way subsets).

The data model lives in :mod:`~clipood_plugin.protocols.records`; the protocol functions are
re-exported here for ``from clipood_plugin.protocols import …``.
"""

from __future__ import annotations

from clipood_plugin.protocols.base_to_new import (
    base_new_labels,
    base_to_new_split,
    few_shot,
    harmonic_mean,
)
from clipood_plugin.protocols.domainbed import (
    holdout_split,
    leave_one_domain_out,
    list_domainbed,
    per_domain_batches,
    seed_hash,
)
from clipood_plugin.protocols.imagenet import imagenet_split, subset_classes
from clipood_plugin.protocols.in_the_wild import in_the_wild_split
from clipood_plugin.protocols.records import ImageRecord, Split

__all__ = [
    "ImageRecord",
    "Split",
    "base_new_labels",
    "base_to_new_split",
    "few_shot",
    "harmonic_mean",
    "holdout_split",
    "imagenet_split",
    "in_the_wild_split",
    "leave_one_domain_out",
    "list_domainbed",
    "per_domain_batches",
    "seed_hash",
    "subset_classes",
]
