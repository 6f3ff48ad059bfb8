"""What the notebooks teach, and nothing else: every stage of the pipeline as small pure
functions and a few classes, importing nothing from the rest of the package.

=====================  ====  ============================================================
``config``                   every setting and its default, once (:class:`WinCLIPConfig`)
``backbone``           01    multi-layer patch tokens and text embeddings
``anchors``            02    prompt ensembles, text anchors, the two-anchor softmax
``memory``             03    greedy k-center coreset, nearest neighbours, ``NormalMemory``
``maps``               04    fusion, foreground, upsampling, MAD normalisation, smoothing,
                             image score, hotspots
``calibration``        04    statistics of the normal images' maps
``scorers``                  the scorer interface, the token method, the method registry
``windows``            07    WinCLIP's windows, harmonic aggregation, WinCLIP+
``anomalydino``        09    DINOv2 patch nearest neighbours to k normal images
``musc``               09    mutual scoring of unlabelled test images (zero-shot)
``detector``                 a scorer plus the shared post-processing; ``FittedClass``
``results``, ``errors``,     result types, exceptions, device / dtype / thread pool
``runtime``
=====================  ====  ============================================================
"""
