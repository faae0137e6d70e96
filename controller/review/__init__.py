"""The review page: people rate the samples the controller kept for review, blind to the version.

`server.ReviewServer` serves `page.html` and its JSON API from the controller's state file (`diffops review`, and the
controller daemon beside its reconcile loop); `queue` holds the pure decisions (what a reviewer sees next, how a
review body is read, the per-version progress). Reviews are stored as feedback with source `review`, so
`diffops quality` and the quality analysis count them with the users' feedback.
"""

from controller.review.server import ReviewServer

__all__ = ["ReviewServer"]
