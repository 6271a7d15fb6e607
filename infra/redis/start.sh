#!/bin/sh
# Entrypoint of docker-compose.yml's redis service: ACL users from the environment, then the
# image's own entrypoint (docs/security.md).
#
# - BORDERFLOW_REDIS_USERNAME / _PASSWORD: the pipeline (workers, migrate, host-side tools).
# - BORDERFLOW_STOREFRONT_REDIS_USERNAME / _PASSWORD: storefronts, read-only on bf:* keys.
# - The `default` user is switched off: every client must name its user.
#
# The rules are the local stack's (REDIS_PIPELINE_ACL / REDIS_STOREFRONT_ACL in infra/stack.py;
# tests/unit/test_compose.py keeps them equal). Passwords are written as SHA-256 hashes to an ACL
# file only the redis user can read, never to the command line (`ps` would show them).
set -eu

: "${BORDERFLOW_REDIS_USERNAME:?}" "${BORDERFLOW_REDIS_PASSWORD:?}"
: "${BORDERFLOW_STOREFRONT_REDIS_USERNAME:?}" "${BORDERFLOW_STOREFRONT_REDIS_PASSWORD:?}"
PREFIX="${BORDERFLOW_REDIS_PREFIX:-bf:}"

# printf is a shell builtin: the password is in no process's argv.
sha256() { printf '%s' "$1" | sha256sum | cut -d ' ' -f 1; }

ACL_FILE=/tmp/borderflow-users.acl
umask 077
cat > "$ACL_FILE" <<ACL
user default off resetpass resetkeys resetchannels -@all
user ${BORDERFLOW_REDIS_USERNAME} on #$(sha256 "$BORDERFLOW_REDIS_PASSWORD") ~* resetchannels -@all +@read +@write +@transaction +@connection +eval +evalsha +script|load +script|exists -@dangerous
user ${BORDERFLOW_STOREFRONT_REDIS_USERNAME} on #$(sha256 "$BORDERFLOW_STOREFRONT_REDIS_PASSWORD") %R~${PREFIX}* resetchannels -@all +@read +@transaction +@connection -@dangerous -scan
ACL
# The image's entrypoint drops from root to the redis user before it starts the server.
if [ "$(id -u)" = 0 ]; then
    chown redis:redis "$ACL_FILE"
fi
unset BORDERFLOW_REDIS_PASSWORD BORDERFLOW_STOREFRONT_REDIS_PASSWORD

# AOF so serving state (profiles, recommendations) survives a restart without a replay.
exec docker-entrypoint.sh redis-server --aclfile "$ACL_FILE" --appendonly yes
