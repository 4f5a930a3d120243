"""The conversion study that ``bsbr convert`` and ``experiments/convert*.py`` run, apart from the library.

- :mod:`~bsbr.convert.study.checkpoints`: the pretrained models the study converts, found or made on this machine
  (SmolLM2-135M from its GGUF file, a small GPT-2 pretrained on the offline corpora);
- :mod:`~bsbr.convert.study.windows`: token windows of the offline corpora (train split for healing, valid + test
  for held-out comparisons);
- :mod:`~bsbr.convert.study.pipeline`: convert, measure, heal, measure again, save (resumable, stage by stage);
- :mod:`~bsbr.convert.study.report`: the Markdown and PNG report of a run.

A user converting a model needs none of these: :mod:`bsbr.convert` holds converting, the attention backend, the
cache, healing and metrics.
"""
