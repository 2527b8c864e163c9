"""The ramp-board 0.10.1 schema, as ramp-database's ``create_all`` builds it.

Every table ramp-database creates is declared here, column for column, so that
our baseline migration produces a database ramp-board's frontend and
ramp-database's tools accept, and so that the dispatcher's queries can join
any of them. This describes a fixed external version: do not change it; the
dispatcher's own objects live in :mod:`ramp_dispatcher.database.dispatcher_schema`.

ramp-database sets its defaults in Python, so the DDL has no DEFAULT clauses
(except ``update_timestamp``, which has ``now()``): whoever inserts a row
supplies every value. :data:`SUBMISSION_DEFAULTS` and friends hold those values.
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    func,
)
from sqlalchemy.types import TypeDecorator


class NumpyBlob(TypeDecorator):
    """ramp-database's blob format: ``zlib.compress(np.array(value).dumps())``.

    ``None`` is stored as a pickled 0-d object array, never SQL NULL, exactly as
    ramp-database does; reading gives back whatever was pickled.
    """

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> bytes:
        import numpy as np  # here, not at module level: keeps the daemon's start-up light

        return zlib.compress(np.array(value).dumps())

    def process_result_value(self, value: bytes | None, dialect: Any) -> Any:
        if value is None:
            return None
        # ramp-board's format is a pickle; these rows are written by ramp-board
        # and by us only.
        return pickle.loads(zlib.decompress(value))


SUBMISSION_STATES = (
    "new",
    "checked",
    "checking_error",
    "trained",
    "training_error",
    "validated",
    "validating_error",
    "tested",
    "testing_error",
    "training",
    "sent_to_training",
    "scored",
)

submission_states = Enum(*SUBMISSION_STATES, name="submission_states")
submission_types = Enum("live", "test", name="submission_types")
cv_fold_types = Enum("live", "test", name="cv_fold_types")
access_level = Enum("admin", "user", "asked", "not_confirmed", name="access_level")
team_status = Enum("asked", "accepted", name="status")
submission_similarity_type = Enum(
    "target_credit", "source_credit", "thirdparty_credit", name="submission_similarity_type"
)
user_interaction_type = Enum(
    "copy",
    "download",
    "giving credit",
    "landing",
    "login",
    "logout",
    "looking at error",
    "looking at event",
    "looking at problem",
    "looking at problems",
    "looking at leaderboard",
    "looking at my_submissions",
    "looking at private leaderboard",
    "looking at submission",
    "looking at user",
    "save",
    "signing up at event",
    "submit",
    "upload",
    name="user_interaction_type",
)

metadata = MetaData()


def _pk() -> Column:
    return Column("id", Integer, primary_key=True)


extensions = Table(
    "extensions", metadata, _pk(), Column("name", String, nullable=False, unique=True)
)

keywords = Table(
    "keywords",
    metadata,
    _pk(),
    Column("name", String, nullable=False, unique=True),
    Column("type", String, nullable=False),
    Column("category", String),
    Column("description", String),
)

score_types = Table(
    "score_types",
    metadata,
    _pk(),
    Column("name", String, nullable=False, unique=True),
    Column("is_lower_the_better", Boolean, nullable=False),
    Column("minimum", Float, nullable=False),
    Column("maximum", Float, nullable=False),
)

submission_file_types = Table(
    "submission_file_types",
    metadata,
    _pk(),
    Column("name", String, nullable=False, unique=True),
    Column("is_editable", Boolean),
    Column("max_size", Integer),
)

users = Table(
    "users",
    metadata,
    _pk(),
    Column("name", String(20), nullable=False, unique=True),
    Column("hashed_password", String, nullable=False),
    Column("lastname", String(256), nullable=False),
    Column("firstname", String(256), nullable=False),
    Column("email", String(256), nullable=False, unique=True),
    Column("linkedin_url", String(256)),
    Column("twitter_url", String(256)),
    Column("facebook_url", String(256)),
    Column("google_url", String(256)),
    Column("github_url", String(256)),
    Column("website_url", String(256)),
    Column("hidden_notes", String),
    Column("bio", String(1024)),
    Column("is_want_news", Boolean),
    Column("access_level", access_level),
    Column("signup_timestamp", DateTime, nullable=False),
    Column("update_timestamp", DateTime, server_default=func.now()),
    Column("is_authenticated", Boolean),
)

workflows = Table(
    "workflows", metadata, _pk(), Column("name", String, nullable=False, unique=True)
)

problems = Table(
    "problems",
    metadata,
    _pk(),
    Column("name", String, nullable=False, unique=True),
    Column("workflow_id", Integer, ForeignKey("workflows.id"), nullable=False),
    Column("path_ramp_kit", String, nullable=False),
    Column("path_ramp_data", String, nullable=False),
)

submission_file_type_extensions = Table(
    "submission_file_type_extensions",
    metadata,
    _pk(),
    Column("type_id", Integer, ForeignKey("submission_file_types.id"), nullable=False),
    Column("extension_id", Integer, ForeignKey("extensions.id"), nullable=False),
    UniqueConstraint("type_id", "extension_id", name="we_constraint"),
)

teams = Table(
    "teams",
    metadata,
    _pk(),
    Column("name", String(20), nullable=False, unique=True),
    Column("admin_id", Integer, ForeignKey("users.id")),
    Column("is_individual", Boolean, nullable=False),
    Column("creation_timestamp", DateTime, nullable=False),
)

workflow_element_types = Table(
    "workflow_element_types",
    metadata,
    _pk(),
    Column("name", String, nullable=False, unique=True),
    Column("type_id", Integer, ForeignKey("submission_file_types.id"), nullable=False),
)

events = Table(
    "events",
    metadata,
    _pk(),
    Column("name", String, nullable=False, unique=True),
    Column("title", String, nullable=False),
    Column("problem_id", Integer, ForeignKey("problems.id"), nullable=False),
    Column("max_members_per_team", Integer),
    Column("max_n_ensemble", Integer),
    Column("is_send_trained_mails", Boolean),
    Column("is_send_submitted_mails", Boolean),
    Column("is_public", Boolean),
    Column("is_controled_signup", Boolean),
    Column("is_competitive", Boolean),
    Column("min_duration_between_submissions", Integer),
    Column("opening_timestamp", DateTime),
    Column("public_opening_timestamp", DateTime),
    Column("closing_timestamp", DateTime),
    Column("official_score_name", String),
    Column("combined_combined_valid_score", Float),
    Column("combined_combined_test_score", Float),
    Column("combined_foldwise_valid_score", Float),
    Column("combined_foldwise_test_score", Float),
    Column("n_submissions", Integer),
    Column("public_leaderboard_html_no_links", String),
    Column("public_leaderboard_html_with_links", String),
    Column("private_leaderboard_html", String),
    Column("failed_leaderboard_html", String),
    Column("new_leaderboard_html", String),
    Column("public_competition_leaderboard_html", String),
    Column("private_competition_leaderboard_html", String),
    Column("ramp_sandbox_name", String, nullable=False),
    Column("path_ramp_submissions", String, nullable=False),
)

problem_keywords = Table(
    "problem_keywords",
    metadata,
    _pk(),
    Column("description", String),
    Column("problem_id", Integer, ForeignKey("problems.id"), nullable=False),
    Column("keyword_id", Integer, ForeignKey("keywords.id"), nullable=False),
)

user_teams = Table(
    "user_teams",
    metadata,
    _pk(),
    Column("user_id", Integer, ForeignKey("users.id")),
    Column("team_id", Integer, ForeignKey("teams.id")),
    Column("status", team_status),
    Column("update_timestamp", DateTime, server_default=func.now()),
)

workflow_elements = Table(
    "workflow_elements",
    metadata,
    _pk(),
    Column("name", String, nullable=False),
    Column("workflow_id", Integer, ForeignKey("workflows.id")),
    Column(
        "workflow_element_type_id",
        Integer,
        ForeignKey("workflow_element_types.id"),
        nullable=False,
    ),
)

cv_folds = Table(
    "cv_folds",
    metadata,
    _pk(),
    Column("type", cv_fold_types),
    Column("train_is", NumpyBlob, nullable=False),
    Column("test_is", NumpyBlob, nullable=False),
    Column("event_id", Integer, ForeignKey("events.id"), nullable=False),
)

event_admins = Table(
    "event_admins",
    metadata,
    _pk(),
    Column("event_id", Integer, ForeignKey("events.id"), nullable=False),
    Column("admin_id", Integer, ForeignKey("users.id"), nullable=False),
)

event_score_types = Table(
    "event_score_types",
    metadata,
    _pk(),
    Column("name", String, nullable=False),
    Column("event_id", Integer, ForeignKey("events.id"), nullable=False),
    Column("score_type_id", Integer, ForeignKey("score_types.id"), nullable=False),
    Column("precision", Integer),
    UniqueConstraint("event_id", "score_type_id", name="es_constraint"),
    UniqueConstraint("event_id", "name", name="en_constraint"),
)

event_teams = Table(
    "event_teams",
    metadata,
    _pk(),
    Column("event_id", Integer, ForeignKey("events.id"), nullable=False),
    Column("team_id", Integer, ForeignKey("teams.id"), nullable=False),
    Column("is_active", Boolean),
    Column("last_submission_name", String),
    Column("signup_timestamp", DateTime, nullable=False),
    Column("approved", Boolean),
    Column("leaderboard_html", String),
    Column("failed_leaderboard_html", String),
    Column("new_leaderboard_html", String),
    UniqueConstraint("event_id", "team_id", name="et_constraint"),
)

submissions = Table(
    "submissions",
    metadata,
    _pk(),
    Column("event_team_id", Integer, ForeignKey("event_teams.id"), nullable=False),
    Column("name", String(20), nullable=False),
    Column("hash_", String, nullable=False, index=True, unique=True),
    Column("submission_timestamp", DateTime, nullable=False),
    Column("sent_to_training_timestamp", DateTime),
    Column("training_timestamp", DateTime),
    Column("contributivity", Float),
    Column("historical_contributivity", Float),
    Column("type", submission_types),
    Column("state", String),
    Column("queue_position", Integer),
    Column("error_msg", String),
    Column("is_valid", Boolean),
    Column("is_to_ensemble", Boolean),
    Column("is_in_competition", Boolean),
    Column("notes", String),
    Column("train_time_cv_mean", Float),
    Column("valid_time_cv_mean", Float),
    Column("test_time_cv_mean", Float),
    Column("train_time_cv_std", Float),
    Column("valid_time_cv_std", Float),
    Column("test_time_cv_std", Float),
    Column("max_ram", Float),
    Column("user_name", String),
    UniqueConstraint("event_team_id", "name", name="ts_constraint"),
)

historical_contributivity = Table(
    "historical_contributivity",
    metadata,
    _pk(),
    Column("timestamp", DateTime, nullable=False),
    Column("submission_id", Integer, ForeignKey("submissions.id")),
    Column("contributivity", Float),
    Column("historical_contributivity", Float),
)

submission_files = Table(
    "submission_files",
    metadata,
    _pk(),
    Column("submission_id", Integer, ForeignKey("submissions.id"), nullable=False),
    Column("workflow_element_id", Integer, ForeignKey("workflow_elements.id"), nullable=False),
    Column(
        "submission_file_type_extension_id",
        Integer,
        ForeignKey("submission_file_type_extensions.id"),
        nullable=False,
    ),
)

submission_on_cv_folds = Table(
    "submission_on_cv_folds",
    metadata,
    _pk(),
    Column("submission_id", Integer, ForeignKey("submissions.id"), nullable=False),
    Column("cv_fold_id", Integer, ForeignKey("cv_folds.id"), nullable=False),
    Column("contributivity", Float),
    Column("best", Boolean),
    Column("train_time", Float),
    Column("valid_time", Float),
    Column("test_time", Float),
    Column("state", submission_states),
    Column("error_msg", String),
    UniqueConstraint("submission_id", "cv_fold_id", name="sc_constraint"),
)

submission_scores = Table(
    "submission_scores",
    metadata,
    _pk(),
    Column("submission_id", Integer, ForeignKey("submissions.id"), nullable=False),
    Column("event_score_type_id", Integer, ForeignKey("event_score_types.id"), nullable=False),
    Column("valid_score_cv_bag", Float),
    Column("test_score_cv_bag", Float),
    Column("valid_score_cv_bags", NumpyBlob),
    Column("test_score_cv_bags", NumpyBlob),
)

submission_similaritys = Table(
    "submission_similaritys",
    metadata,
    _pk(),
    Column("type", submission_similarity_type, nullable=False),
    Column("note", String),
    Column("timestamp", DateTime),
    Column("similarity", Float),
    Column("user_id", Integer, ForeignKey("users.id")),
    Column("source_submission_id", Integer, ForeignKey("submissions.id")),
    Column("target_submission_id", Integer, ForeignKey("submissions.id")),
)

submission_score_on_cv_folds = Table(
    "submission_score_on_cv_folds",
    metadata,
    _pk(),
    Column(
        "submission_on_cv_fold_id",
        Integer,
        ForeignKey("submission_on_cv_folds.id"),
        nullable=False,
    ),
    Column("submission_score_id", Integer, ForeignKey("submission_scores.id"), nullable=False),
    Column("train_score", Float),
    Column("valid_score", Float),
    Column("test_score", Float),
    UniqueConstraint("submission_on_cv_fold_id", "submission_score_id", name="ss_constraint"),
)

user_interactions = Table(
    "user_interactions",
    metadata,
    _pk(),
    Column("timestamp", DateTime, nullable=False),
    Column("interaction", user_interaction_type, nullable=False),
    Column("note", String),
    Column("submission_file_diff", String),
    Column("submission_file_similarity", Float),
    Column("ip", String),
    Column("user_id", Integer, ForeignKey("users.id")),
    Column("problem_id", Integer, ForeignKey("problems.id")),
    Column("event_team_id", Integer, ForeignKey("event_teams.id")),
    Column("submission_id", Integer, ForeignKey("submissions.id")),
    Column("submission_file_id", Integer, ForeignKey("submission_files.id")),
)


# The values ramp-database's constructors and ``reset`` give a new row; raw
# inserts must supply them since the DDL has no defaults.
SUBMISSION_DEFAULTS: dict[str, Any] = {
    "contributivity": 0.0,
    "historical_contributivity": 0.0,
    "type": "live",
    "state": "new",
    "queue_position": -1,
    "error_msg": "",
    "is_valid": True,
    "is_to_ensemble": True,
    "is_in_competition": True,
    "notes": "",
    "train_time_cv_mean": 0.0,
    "valid_time_cv_mean": 0.0,
    "test_time_cv_mean": 0.0,
    "train_time_cv_std": 0.0,
    "valid_time_cv_std": 0.0,
    "test_time_cv_std": 0.0,
    "max_ram": 0.0,
}

SUBMISSION_ON_CV_FOLD_DEFAULTS: dict[str, Any] = {
    "contributivity": 0.0,
    "best": False,
    "train_time": 0.0,
    "valid_time": 0.0,
    "test_time": 0.0,
    "state": "new",
    "error_msg": "",
}
