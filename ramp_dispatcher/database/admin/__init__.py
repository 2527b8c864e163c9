"""Admin set-up of a ramp-board database without ramp-database installed.

Each function writes the rows ramp-database 0.10.1's own tool of the same name
writes (same tables, same values, same insert order, hence the same ids on a
fresh database), so ramp-board's frontend and ramp-database read them as their
own. The facts reproduced, all from ramp-database 0.10.1's source:

- ``add_problem``: ramp-utils' ``deploy_ramp_event`` first registers the file
  types and extensions (``setup_files_extension_type``); ramp-database's
  ``add_workflow`` then adds the workflow (named after the workflow class), one
  ``workflow_element_types`` row per element (file type inferred from the
  extension, ``py`` when there is none) and one ``workflow_elements`` row.
- ``add_event``: the ``events`` row with the model's Python defaults, mails
  off, ``official_score_name`` = first score type; one ``cv_folds`` row per
  fold of ``get_cv`` (type ``live``); per score type, a ``score_types`` row that
  ramp-database fills with a random uuid4 name, ``True, 0, 1`` (sic: the real
  bounds live in ``problem.py``) and the ``event_score_types`` row. Nothing else.
- ``add_user``: the user (bcrypt hash, email lower-cased, empty profile
  strings) and its individual team of the same name; no ``user_teams`` row.
- ``sign_up_team``: an ``event_teams`` row, then the sandbox submission from
  ``<kit>/submissions/<sandbox>``, then ``approved = True``.
- ``add_submission``: the submission, its scores, folds and fold scores at the
  "worst" value of each score type (taken from ``problem.py``), its files; the
  files copied to ``submission_%09d``; ``events.n_submissions``,
  ``event_teams.last_submission_name`` and the "new submissions" leaderboard
  HTML of the event and of the team.

All functions take a Connection inside a transaction; the caller commits.
ramp-workflow (through the kit's ``problem.py``) is imported lazily, in ``kit`` only.

The package, one module per job: ``lookup`` (the error type, rows by name),
``kit`` (the kit's ``problem.py``, the workflow and file-type registry),
``events`` (problems and events: add, delete, deploy), ``users``, ``teams``
(sign-up) and ``submissions`` (add, resubmit, files). The "new submissions"
HTML comes from :mod:`ramp_dispatcher.leaderboards.update`. The public names
are re-exported here.
"""

from .events import EVENT_DEFAULTS, add_event, add_problem, deploy_event
from .kit import (
    DEFAULT_EXTENSIONS,
    DEFAULT_FILE_TYPES,
    DEFAULT_TYPE_EXTENSIONS,
    ensure_file_types,
    load_problem_module,
)
from ...leaderboards.update import new_leaderboard_html, update_new_leaderboards
from .lookup import MAX_NAME_LENGTH, AdminError
from .submissions import add_submission, submission_hash
from .teams import sign_up_team
from .users import USER_ACCESS_LEVELS, add_user, hash_password

__all__ = [
    "DEFAULT_EXTENSIONS",
    "DEFAULT_FILE_TYPES",
    "DEFAULT_TYPE_EXTENSIONS",
    "EVENT_DEFAULTS",
    "MAX_NAME_LENGTH",
    "USER_ACCESS_LEVELS",
    "AdminError",
    "add_event",
    "add_problem",
    "add_submission",
    "add_user",
    "deploy_event",
    "ensure_file_types",
    "hash_password",
    "load_problem_module",
    "new_leaderboard_html",
    "sign_up_team",
    "submission_hash",
    "update_new_leaderboards",
]
