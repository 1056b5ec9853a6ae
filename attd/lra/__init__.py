"""Long Range Arena data for ATTD: ListOps, Pathfinder and byte-level Text.

Everything is generated or read from disk; nothing is downloaded. Each task has a seeded
generator (or a built-in corpus) with a per-example difficulty, and a loader for LRA's
released format:

- :mod:`~attd.lra.listops`: LRA's ListOps recipe, its TSV files;
- :mod:`~attd.lra.pathfinder`: curved-path images with markers, the official
  ``metadata/*.npy`` + PNG layout;
- :mod:`~attd.lra.text`: the aclImdb folder layout, and a byte-level task built from
  Python's own documentation and standard library (:mod:`metattt.data.text_corpora`);
- :mod:`~attd.lra.tasks`: a task's train, in-distribution and shifted test splits.
"""

from attd.lra.listops import (
    ListOps,
    evaluate,
    generate_listops,
    load_listops_tsv,
    parse,
    save_listops_tsv,
)
from attd.lra.pathfinder import (
    Pathfinder,
    PathfinderFolder,
    generate_pathfinder,
    load_pathfinder,
    save_pathfinder,
    to_sequences,
)
from attd.lra.tasks import (
    SEED_STRIDE,
    LRATask,
    Split,
    data_seed,
    listops_split,
    listops_task,
    pathfinder_split,
    pathfinder_task,
    text_split,
    text_task,
)
from attd.lra.text import ByteText, load_aclimdb, stdlib_text_task

__all__ = [
    "SEED_STRIDE",
    "LRATask",
    "Split",
    "data_seed",
    "listops_split",
    "listops_task",
    "pathfinder_split",
    "pathfinder_task",
    "text_split",
    "text_task",
    "ByteText",
    "ListOps",
    "Pathfinder",
    "PathfinderFolder",
    "evaluate",
    "generate_listops",
    "generate_pathfinder",
    "load_aclimdb",
    "load_listops_tsv",
    "load_pathfinder",
    "parse",
    "save_listops_tsv",
    "save_pathfinder",
    "stdlib_text_task",
    "to_sequences",
]
