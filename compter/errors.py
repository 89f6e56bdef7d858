"""What can go wrong, said without HTTP: the API maps each to a status code."""


class CompterError(Exception):
    """Base of the errors a client or operator can act on; the message says how."""


class NotFound(CompterError):
    pass


class Invalid(CompterError):
    pass


class StoreUnavailable(CompterError):
    pass
