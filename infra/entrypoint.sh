#!/bin/sh
# Entry point of the project's image: for each variable NAME_FILE=/path in the environment, export
# NAME with the file's contents (the convention of the official postgres image), so secrets can be
# mounted as files (compose secrets, Kubernetes secret volumes, a docker work pool's volumes)
# instead of sitting in the container's environment definition. Then run the command.
set -eu
for assignment in $(env | grep -o '^[A-Z0-9_]*_FILE=' || true); do
    file_var=${assignment%=}
    name=${file_var%_FILE}
    path=$(printenv "$file_var")
    [ -r "$path" ] || { echo "free-entrypoint: $file_var=$path is not a readable file" >&2; exit 1; }
    export "$name=$(cat "$path")"
    unset "$file_var"
done
exec "$@"
