"""Exceptions of the objective."""


class NonFiniteInputError(ValueError):
    """A NaN or inf in the inputs (teacher signals or student logits).

    A data fault rather than a bug: the actor may skip the micro-batch and count it.
    Every other bad input is a plain ValueError naming the parameter and its valid range.
    """
