"""The one base class of the errors that stop the daemon before it starts."""


class SetupError(Exception):
    """The daemon cannot start as configured; ``str()`` is one line for the operator,
    naming the file, section and key (or the database, or the listener) at fault.

    ``twistd metadatad`` catches this once (:func:`metadatad.tap.makeService`) and
    exits with that line; ``metadatad-manage`` prints it the same way.
    """
