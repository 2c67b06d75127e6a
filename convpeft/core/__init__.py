"""Foundations: the vocabulary and conventions every other layer of convpeft uses.

Nothing here imports anything else from convpeft (a test checks it from the imports,
tests/test_layout.py; the layers are drawn in docs/layout.md):

* :mod:`.layer_kinds`: the one layer-kind vocabulary (standard, pointwise, grouped, depthwise,
  linear) and ``target`` selection;
* :mod:`.conv_variants`: conv subclasses (timm's ``Conv2dSame``, weight-standardised convs),
  their effective weight and padding, and their registry;
* :mod:`.flops`: the FLOP convention (2 FLOPs per multiply-accumulate) and the analytic formulas;
* :mod:`.amp`: how custom autograd Functions behave under autocast;
* :mod:`.accounting`: tensor accounting (storage identity, optimizer state bytes, meta copies);
* :mod:`.batchnorm`: BN modes for a statistics pass, BN snapshots;
* :mod:`.registry`: the ``get_*`` / ``list_*`` registries;
* :mod:`.paths`: the cache folder.
"""
