"""User tools, apart from the training core: ``r1v3 tiny``, ``demo``, ``ablate``, ``report`` and
``rejection-sample``. They may use everything below them (stages, callbacks, data modules); the
training core never imports them."""
