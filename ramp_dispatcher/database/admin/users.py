"""Users (with their individual team) and their passwords."""

from __future__ import annotations

from sqlalchemy import Connection, insert, select

from .. import ramp_schema as rs
from ..clock import utcnow
from .lookup import MAX_NAME_LENGTH, AdminError

USER_ACCESS_LEVELS = ("admin", "user", "asked", "not_confirmed")


def hash_password(password: str) -> str:
    """bcrypt, as ramp-database: the frontend checks logins with bcrypt."""
    try:
        import bcrypt
    except ImportError:
        raise AdminError(
            "adding a user needs the 'bcrypt' package (ramp-board's frontend checks "
            "passwords with bcrypt): pip install bcrypt"
        ) from None
    encoded = password.encode("utf-8")
    if len(encoded) > 72:
        # bcrypt only reads 72 bytes (recent versions refuse longer input).
        raise AdminError("the password is longer than 72 bytes, which bcrypt cannot hash")
    return bcrypt.hashpw(encoded, bcrypt.gensalt()).decode()


def add_user(
    conn: Connection,
    name: str,
    password: str,
    email: str,
    access_level: str = "user",
    firstname: str = "",
    lastname: str = "",
) -> int:
    """Add a user and its individual team of the same name; return the user id."""
    if not name:
        raise AdminError("the user name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise AdminError(f"user name {name!r} is longer than {MAX_NAME_LENGTH} characters")
    if access_level not in USER_ACCESS_LEVELS:
        raise AdminError(
            f"access level {access_level!r} is not one of {', '.join(USER_ACCESS_LEVELS)}"
        )
    if not password:
        raise AdminError("the password is empty")
    email = email.lower()  # ramp-database stores emails lower-cased
    u, t = rs.users, rs.teams
    # ramp-database's NameClashError messages.
    clashes = []
    if conn.execute(select(u.c.id).where(u.c.name == name)).first() is not None:
        clashes.append(f"username {name!r} is already in use")
    elif conn.execute(select(t.c.id).where(t.c.name == name)).first() is not None:
        clashes.append(f"username {name!r} is already in use as a team name")
    if conn.execute(select(u.c.id).where(u.c.email == email)).first() is not None:
        clashes.append(f"email {email!r} is already in use")
    if clashes:
        raise AdminError(" and ".join(clashes))
    now = utcnow()
    user_id = conn.execute(
        insert(u).values(
            name=name,
            hashed_password=hash_password(password),
            lastname=lastname,
            firstname=firstname,
            email=email,
            linkedin_url="",
            twitter_url="",
            facebook_url="",
            google_url="",
            github_url="",
            website_url="",
            hidden_notes="",
            bio="",
            is_want_news=True,
            access_level=access_level,
            signup_timestamp=now,
            is_authenticated=False,
        )
    ).inserted_primary_key[0]
    conn.execute(
        insert(t).values(name=name, admin_id=user_id, is_individual=True, creation_timestamp=now)
    )
    return user_id
