"""Whole studies: ``mgaussian bids`` reconstructs every subject (and session) of a BIDS dataset
on Dask and writes the volumes as a BIDS derivative dataset (issue 18).

One idea per module:

* :mod:`.layout` finds each subject's stacks, sidecars and masks from BIDS's naming rules;
* :mod:`.task` is what one Dask task does for one subject-session: ``mgaussian reconstruct`` in a
  subprocess in a work folder, then the outputs moved into place atomically;
* :mod:`.runner` starts or attaches to a Dask cluster, submits the tasks with retries and prints
  one progress line per finished subject;
* :mod:`.summary` writes the derivative's ``dataset_description.json``, the per-subject status
  records, ``summary.tsv``, ``index.html`` and the mid-plane thumbnails;
* :mod:`.command` is the command line: options, up-front checks, and the run from start to end.

Dask is imported only by :mod:`.runner`, so ``mgaussian --help`` stays instant.
"""
