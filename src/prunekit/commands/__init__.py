"""The command line's commands beyond the parser itself (:mod:`prunekit.cli`): finding the model a
command names (:mod:`.models`) and ``prunekit prune`` (:mod:`.prune`)."""
