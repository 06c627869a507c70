#!/usr/bin/env bash
#
# deploy.sh: the one host script every appspec hook calls.
#
# nonstop puts this script into every bundle, and the bundle's appspec.yml runs it for each
# lifecycle event, through nonstop's local runner (this host) or the AWS CodeDeploy agent
# (a fleet host). It does blue/green on one host: two ports, one live (serving traffic) and
# one idle. A release goes to the idle port and traffic moves only once it is healthy:
#
#   ApplicationStop, BeforeInstall  nothing: the live version keeps running
#   AfterInstall                    stop whatever still runs on the idle port
#   ApplicationStart                start the new version on the idle port, detached
#   ValidateService                 health-check it, then switch traffic to it; if it never
#                                   gets healthy, stop it: traffic stays where it was
#   anything else                   nothing
#
# Environment, set by the runner:
#   LIFECYCLE_EVENT, DEPLOYMENT_ID, APPLICATION_NAME, DEPLOYMENT_GROUP_NAME  (CodeDeploy's)
#   NONSTOP_VERSION             version being deployed (else the VERSION file beside this script)
#   NONSTOP_IDLE_PORT           port the new version goes to (empty: ask which profile is live)
#   NONSTOP_IDLE_PROFILE        its profile, e.g. real2 (only printed)
#   NONSTOP_LIVE_PORT           port serving traffic now; empty before the first deploy
#   NONSTOP_RUN                 the command line that starts the new version on the idle port
#   NONSTOP_RUN_DIR             directory for <port>.pid and <port>.log
#   NONSTOP_HEALTH_URL          default http://127.0.0.1:<idle port>/profile
#   NONSTOP_HEALTH_ATTEMPTS     default 20
#   NONSTOP_HEALTH_INTERVAL_MS  default 250
#   NONSTOP_SWITCH_URL          nonstop's switch endpoint (empty: switch nginx instead)
#   NONSTOP_SWITCH_TOKEN        bearer token for it
#   NONSTOP_DRAIN_URL           nonstop's drain endpoint, called before an instance is stopped
#                               (empty: stop at once)
#   NONSTOP_DRAIN_TIMEOUT_SECS  how long that drain may take, default 30
# Fleet fallback, when NONSTOP_SWITCH_URL is empty (nginx in front, the classic recipe):
#   NONSTOP_NGINX_INCLUDE       the file nginx includes: `set $service_url http://127.0.0.1:<port>;`
#   NONSTOP_NGINX_BIN           default nginx
#   NONSTOP_NGINX_CONF          passed to nginx as -c when set
#   NONSTOP_PROFILE_URL         asked for the live profile, default http://127.0.0.1/profile
#   NONSTOP_PORTS               default "8081 8082"
#   NONSTOP_PROFILES            default "real1 real2"
#   NONSTOP_RUN_TEMPLATE        when NONSTOP_RUN is unset: the app's `run` line, with
#                               {artifact}, {port} and {profile} filled in here
#   NONSTOP_ARTIFACT            what {artifact} stands for
#   NONSTOP_HEALTH_PATH         when NONSTOP_HEALTH_URL is unset, default /profile
#   NONSTOP_ENV_FILE            the host's env file for the app (its secrets), read when no
#                               runner set NONSTOP_APP_ENV
# The app's own env:
#   NONSTOP_APP_ENV             names of the app's env vars the runner set for this hook;
#                               unset on a fleet host, where they come from app.env (beside
#                               this script: the config's `env`) and NONSTOP_ENV_FILE
# On a fleet host nobody sets these: nonstop bundles them as `nonstop.env` beside this
# script, one NAME=value per line. It is read, never sourced, and a variable already set
# wins, so the local runner's own values always come first.
#
# The instance gets exactly: PATH, HOME, LANG, TZ, CodeDeploy's names, NONSTOP_* but the
# switch token, and the app's own env; nothing else of this hook's environment (which, on a
# fleet host, is the CodeDeploy agent's).
#
# Needs bash, curl and setsid (util-linux). Every value above is only ever used quoted, as
# one argument; the one exception is NONSTOP_RUN, which comes from nonstop's trusted config
# and is meant to be read by a shell, like a line of a Procfile.

set -euo pipefail
# One stream, in order: a runner reports a failed hook by its last line, and two pipes read
# side by side could deliver stdout's last line after stderr's.
exec 2>&1

EVENT=${LIFECYCLE_EVENT:-}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Filled in by resolve_slots.
IDLE_PORT=""
IDLE_PROFILE=""
LIVE_PORT=""
RUN_DIR=""

# --- lifecycle events ----------------------------------------------------------------------

on_nothing_to_do() {
  log "nothing to do: in blue/green the live version keeps running until ValidateService moves traffic"
}

on_after_install() {
  resolve_slots
  require_run_dir
  stop_instance "$IDLE_PORT"
}

on_application_start() {
  resolve_slots
  require_run_dir
  local run=${NONSTOP_RUN:-}
  if [[ -z $run && -n ${NONSTOP_RUN_TEMPLATE:-} ]]; then
    [[ -n ${NONSTOP_ARTIFACT:-} || $NONSTOP_RUN_TEMPLATE != *"{artifact}"* ]] ||
      die "NONSTOP_RUN_TEMPLATE names {artifact} but NONSTOP_ARTIFACT is not set"
    run=$(fill_run_template)
  fi
  [[ -n $run ]] || die "NONSTOP_RUN is empty: nothing to start"
  command -v setsid >/dev/null || die "setsid (util-linux) is needed to detach the app from this hook"
  mkdir -p "$RUN_DIR"

  # AfterInstall normally stopped it already; a retried hook must not start a second copy.
  local old_pid
  old_pid=$(recorded_pid "$IDLE_PORT")
  if [[ -n $old_pid ]] && instance_alive "$old_pid" "$(pid_file "$IDLE_PORT")"; then
    stop_instance "$IDLE_PORT"
  fi

  local version log_file pid_file
  version=$(deploy_version)
  log_file=$(app_log_file "$IDLE_PORT")
  pid_file=$(pid_file "$IDLE_PORT")
  printf '\n==== %s deployment %s: starting %s on port %s: %s\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${DEPLOYMENT_ID:-?}" "$version" "$IDLE_PORT" "$run" >>"$log_file"

  # The app must outlive this hook and nonstop itself, so:
  # - setsid gives it its own session: no signal aimed at the runner's process group or
  #   terminal reaches it. A background job of a non-interactive shell is not a process-group
  #   leader, so setsid calls setsid() and execs without forking. So $! is the app's own
  #   pid, and the pid file names the process that `kill` must reach.
  # - fds 0, 1 and 2 point away from the hook's, and any other inherited fd is closed: the
  #   runner reads the hook's stdout and stderr until EOF, which would never come while the
  #   app held a copy of them.
  # - its environment is built from nothing (instance_env): the switch token stays with this
  #   script, and nothing of the runner's own environment reaches the app.
  # - the run line is read by sh (trusted config, see the top); `exec` makes the app take
  #   over that shell's pid, as the subshell's `exec` does with env.
  load_app_env
  instance_env "$version"
  (
    close_inherited_fds
    exec env -i "${INSTANCE_ENV[@]}" setsid sh -c "exec $run"
  ) </dev/null >>"$log_file" 2>&1 &
  local pid=$!

  write_atomically "$pid_file" "$pid"
  # The subshell still has to close fds and reach setsid(); until then the pid is not yet a
  # session leader and would look like a stranger to instance_alive. Wait for it (at most
  # 5 s), so that ValidateService sees the app as it will stay.
  local waited
  for ((waited = 0; waited < 250; waited++)); do
    leads_session "$pid" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep_ms 20
  done
  log "started ${IDLE_PROFILE:-the new version} ($version) on port $IDLE_PORT: pid $pid, log $log_file"
}

on_validate_service() {
  resolve_slots
  require_run_dir
  local attempts=${NONSTOP_HEALTH_ATTEMPTS:-20}
  local interval_ms=${NONSTOP_HEALTH_INTERVAL_MS:-250}
  local url=${NONSTOP_HEALTH_URL:-http://127.0.0.1:$IDLE_PORT${NONSTOP_HEALTH_PATH:-/profile}}
  require_number NONSTOP_HEALTH_ATTEMPTS "$attempts"
  require_number NONSTOP_HEALTH_INTERVAL_MS "$interval_ms"
  ((attempts >= 1)) || die "NONSTOP_HEALTH_ATTEMPTS must be at least 1"

  local pid pid_file
  pid=$(recorded_pid "$IDLE_PORT")
  pid_file=$(pid_file "$IDLE_PORT")
  if [[ -z $pid ]]; then
    log "warning: no pid recorded for port $IDLE_PORT; checking health only"
  fi

  local attempt answer="" healthy=false
  for ((attempt = 1; attempt <= attempts; attempt++)); do
    # A version that crashed at start-up will never get healthy: say so now, with its log.
    if [[ -n $pid ]] && ! instance_alive "$pid" "$pid_file"; then
      abort_release "the new version (pid $pid) exited before it became healthy"
    fi
    if answer=$(curl -fsS --max-time 2 "$url" 2>&1); then
      healthy=true
      break
    fi
    log "health check $attempt/$attempts: $url: $(one_line "$answer")"
    if ((attempt < attempts)); then
      sleep_ms "$interval_ms"
    fi
  done
  if [[ $healthy != true ]]; then
    abort_release "not healthy after $attempts attempts of $url"
  fi
  # Whatever answered must be the process we started, not a stray one holding the port.
  if [[ -n $pid ]] && ! instance_alive "$pid" "$pid_file"; then
    abort_release "the new version (pid $pid) exited; something else answers on port $IDLE_PORT"
  fi
  log "healthy: $url answered '$(one_line "$answer")'"

  if [[ -n ${NONSTOP_SWITCH_URL:-} ]]; then
    switch_with_nonstop
  else
    switch_with_nginx
  fi
}

# --- which port is idle --------------------------------------------------------------------

# Sets IDLE_PORT, IDLE_PROFILE and LIVE_PORT: from nonstop's env vars when given, else by
# asking the live app for its profile (the classic recipe, for fleet hosts).
resolve_slots() {
  IDLE_PORT=${NONSTOP_IDLE_PORT:-}
  IDLE_PROFILE=${NONSTOP_IDLE_PROFILE:-}
  LIVE_PORT=${NONSTOP_LIVE_PORT:-}
  if [[ -z $IDLE_PORT ]]; then
    find_idle_from_live_profile
  fi
  require_port NONSTOP_IDLE_PORT "$IDLE_PORT"
  if [[ -n $LIVE_PORT ]]; then
    require_port NONSTOP_LIVE_PORT "$LIVE_PORT"
  fi
  if [[ $IDLE_PORT == "$LIVE_PORT" ]]; then
    die "the idle port $IDLE_PORT is the live port: refusing to touch the version serving traffic"
  fi
}

# If the live app says it is the first profile, the second slot is idle; otherwise (the
# second profile, or nothing answers yet) the first one is.
find_idle_from_live_profile() {
  local -a ports profiles
  read -r -a ports <<<"${NONSTOP_PORTS:-8081 8082}"
  read -r -a profiles <<<"${NONSTOP_PROFILES:-real1 real2}"
  if ((${#ports[@]} != 2 || ${#profiles[@]} != 2)); then
    die "NONSTOP_PORTS and NONSTOP_PROFILES need exactly two entries each"
  fi
  local url=${NONSTOP_PROFILE_URL:-http://127.0.0.1/profile}
  local live_profile
  live_profile=$(curl -fsS --max-time 2 "$url" 2>/dev/null) || live_profile=""
  live_profile=${live_profile//[$' \t\r\n']/}

  if [[ $live_profile == "${profiles[0]}" ]]; then
    LIVE_PORT=${ports[0]}
    IDLE_PORT=${ports[1]}
    IDLE_PROFILE=${profiles[1]}
  else
    LIVE_PORT=""
    if [[ $live_profile == "${profiles[1]}" ]]; then
      LIVE_PORT=${ports[1]}
    fi
    IDLE_PORT=${ports[0]}
    IDLE_PROFILE=${profiles[0]}
  fi
  log "live profile: '$(one_line "${live_profile:-none}")' (from $url); idle: $IDLE_PROFILE on port $IDLE_PORT"
}

# --- the app's process ---------------------------------------------------------------------

pid_file() { printf '%s/%s.pid' "$RUN_DIR" "$1"; }
app_log_file() { printf '%s/%s.log' "$RUN_DIR" "$1"; }

# Prints the pid recorded for port $1, or nothing.
recorded_pid() {
  local file pid=""
  file=$(pid_file "$1")
  if [[ -f $file ]]; then
    read -r pid <"$file" || true
  fi
  if [[ -n $pid && ! $pid =~ ^[1-9][0-9]*$ ]]; then
    warn "ignoring $file: '$(one_line "$pid")' is not a pid"
    pid=""
  fi
  printf '%s' "$pid"
}

# Whether pid $1 (read from pid file $2) is still the app we started: alive (a zombie is
# not), leading its own session as setsid made it, and started no later than the pid file
# was written. The last two keep a recycled pid (after a reboot, say) from being killed. On
# a host without /proc only `kill -0` is possible.
instance_alive() {
  local pid=$1 file=$2 stat btime ticks written started
  local -a fields
  kill -0 "$pid" 2>/dev/null || return 1
  [[ -r /proc/$pid/stat ]] || return 0
  stat=$(<"/proc/$pid/stat") || return 1
  # The fields after "pid (comm) " (comm may hold spaces): [0] state, [3] session,
  # [19] start time in clock ticks since boot.
  read -r -a fields <<<"${stat##*) }"
  [[ ${fields[0]} != Z && ${fields[3]} == "$pid" ]] || return 1
  btime=$(awk '$1 == "btime" { print $2 }' /proc/stat) || return 0
  ticks=$(getconf CLK_TCK) || return 0
  written=$(stat -c %Y "$file" 2>/dev/null) || return 0
  [[ $btime =~ ^[0-9]+$ && $ticks =~ ^[1-9][0-9]*$ && $written =~ ^[0-9]+$ ]] || return 0
  started=$((btime + fields[19] / ticks))
  # 60 s of slack: btime moves with wall-clock corrections, and a recycled pid needs far longer.
  ((started <= written + 60))
}

# Whether pid $1 leads its own session (what setsid makes of the app). Without /proc,
# assume so.
leads_session() {
  local pid=$1 stat
  local -a fields
  [[ -r /proc/$pid/stat ]] || return 0
  stat=$(<"/proc/$pid/stat") || return 1
  read -r -a fields <<<"${stat##*) }"
  [[ ${fields[3]} == "$pid" ]]
}

# Stops the app recorded on port $1: SIGTERM, up to 10 s to exit, then SIGKILL. Fine if
# nothing runs there.
stop_instance() {
  local port=$1 file pid i
  file=$(pid_file "$port")
  pid=$(recorded_pid "$port")
  if [[ -z $pid ]]; then
    log "nothing recorded on port $port: nothing to stop"
    rm -f "$file"
    return 0
  fi
  if ! instance_alive "$pid" "$file"; then
    log "pid $pid (port $port) is not running (any more)"
    rm -f "$file"
    return 0
  fi

  drain_instance "$port"
  log "stopping pid $pid on port $port (SIGTERM)"
  # The app leads its own process group (setsid): signal the group, so that anything it
  # started goes too.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do # 100 x 0.1 s: up to 10 s to finish in-flight requests
    instance_alive "$pid" "$file" || break
    sleep 0.1
  done
  if instance_alive "$pid" "$file"; then
    log "pid $pid still runs after 10 s: SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      instance_alive "$pid" "$file" || break
      sleep 0.1
    done
    if instance_alive "$pid" "$file"; then
      die "pid $pid on port $port survived SIGKILL"
    fi
  fi
  rm -f "$file"
  log "stopped pid $pid (port $port)"
}

# Before the instance on port $1 is stopped: nonstop's proxy waits until the connections
# still open there (WebSockets, streams) have closed, up to the app's drain_timeout_secs,
# then closes the rest, and says so in one line for the log. Without a drain URL (a fleet
# host behind nginx), or when the drain cannot be reached, the stop goes on at once; a
# drain refused because the port is live stops this script: that instance serves traffic.
drain_instance() {
  local port=$1 timeout=${NONSTOP_DRAIN_TIMEOUT_SECS:-30} response status body
  [[ -n ${NONSTOP_DRAIN_URL:-} ]] || return 0
  require_number NONSTOP_DRAIN_TIMEOUT_SECS "$timeout"
  # The token goes in on stdin (-H @-), as for the switch.
  if response=$(
    printf 'Authorization: Bearer %s\n' "${NONSTOP_SWITCH_TOKEN:-}" |
      curl -sS --max-time $((timeout + 15)) -X POST -H @- -H 'Content-Type: application/json' \
        -d "{\"port\": $port}" -w '\n%{http_code}' "$NONSTOP_DRAIN_URL" 2>&1
  ); then
    status=${response##*$'\n'}
    body=${response%$'\n'*}
    if [[ $status =~ ^2[0-9][0-9]$ && $body =~ \"line\":\"([^\"]*)\" ]]; then
      log "${BASH_REMATCH[1]}"
      return 0
    fi
    if [[ $status == 409 && $body == *"is live"* ]]; then
      die "port $port is live: refusing to stop the instance serving traffic ($(one_line "$body"))"
    fi
    warn "the drain at $NONSTOP_DRAIN_URL answered $status: $(one_line "$body"); stopping at once"
  else
    warn "could not reach the drain at $NONSTOP_DRAIN_URL: $(one_line "$response"); stopping at once"
  fi
}

# Closes every open fd above 2 of this (sub)shell, so that a child started next inherits
# none of them. Without /proc there is nothing to list; the runner is then trusted to have
# marked its own fds close-on-exec.
close_inherited_fds() {
  local path fd
  for path in /proc/"${BASHPID}"/fd/*; do
    fd=${path##*/}
    if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
      exec {fd}>&- || true
    fi
  done
}

# Gives up on this release: says why, shows the app's log, stops the new version, exits 1.
# Only called once traffic is known not to be on the new version.
abort_release() {
  warn "$1"
  local log_file
  log_file=$(app_log_file "$IDLE_PORT")
  if [[ -f $log_file ]]; then
    warn "last 20 lines of $log_file:"
    tail -n 20 "$log_file" >&2 || true
  fi
  log "stopping the new version; traffic stays where it was"
  stop_instance "$IDLE_PORT"
  # The reason again, last: the runner reports a failed hook by its final line.
  die "$1"
}

# --- switching traffic ---------------------------------------------------------------------

# Asks nonstop to point its proxy at the idle port. When the answer is not a clear yes, asks
# where traffic is before giving up: a switch whose answer was lost may have gone through,
# and the instance it went to must not be stopped.
switch_with_nonstop() {
  local response status body
  # The server may take its last look (5 s) and the proxy process's answer (5 s) first.
  # The token goes in on stdin (-H @-), not as an argument, so `ps` never shows it.
  if response=$(
    printf 'Authorization: Bearer %s\n' "${NONSTOP_SWITCH_TOKEN:-}" |
      curl -sS --max-time 30 -X POST -H @- -H 'Content-Type: application/json' \
        -d "{\"port\": $IDLE_PORT}" -w '\n%{http_code}' "$NONSTOP_SWITCH_URL" 2>&1
  ); then
    status=${response##*$'\n'}
    body=${response%$'\n'*}
    if [[ $status =~ ^2[0-9][0-9]$ ]]; then
      log "switched traffic to port $IDLE_PORT: $(one_line "$body")"
      return 0
    fi
    switch_failed "the switch at $NONSTOP_SWITCH_URL answered $status: $(one_line "$body")"
  else
    switch_failed "could not reach the switch at $NONSTOP_SWITCH_URL: $(one_line "$response")"
  fi
}

# The switch said no, or nothing: stops the new version only once the switch says traffic
# is elsewhere.
switch_failed() {
  local live on_idle
  if ! live=$(
    printf 'Authorization: Bearer %s\n' "${NONSTOP_SWITCH_TOKEN:-}" |
      curl -fsS --max-time 10 -H @- "$NONSTOP_SWITCH_URL" 2>/dev/null
  ); then
    die "$1; could not ask where traffic is now, so the new version on port $IDLE_PORT keeps running"
  fi
  on_idle="\"port\":${IDLE_PORT}[,}]"
  if [[ $live =~ $on_idle ]]; then
    log "$1, but traffic is on port $IDLE_PORT: the switch went through"
    return 0
  fi
  abort_release "$1"
}

# The classic recipe: nginx proxies to $service_url, set in an included file. Replace the
# file atomically, check the config, reload; on any failure put the old file back.
switch_with_nginx() {
  local include=${NONSTOP_NGINX_INCLUDE:-}
  if [[ -z $include ]]; then
    abort_release "neither NONSTOP_SWITCH_URL nor NONSTOP_NGINX_INCLUDE is set: no way to switch traffic"
  fi
  local -a nginx=("${NONSTOP_NGINX_BIN:-nginx}")
  if [[ -n ${NONSTOP_NGINX_CONF:-} ]]; then
    nginx+=(-c "$NONSTOP_NGINX_CONF")
  fi
  local dir name next previous="" output
  dir=$(dirname "$include")
  name=$(basename "$include")

  # The temp files sit beside the include so that mv is a rename on one filesystem: nginx
  # reads either the old file or the new one, never half of one.
  next=$(mktemp "$dir/.$name.next.XXXXXX") || abort_release "cannot write in $dir"
  # shellcheck disable=SC2016 # $service_url is nginx's variable, written literally.
  if ! printf 'set $service_url http://127.0.0.1:%s;\n' "$IDLE_PORT" >"$next" ||
    ! chmod 0644 "$next"; then
    rm -f "$next"
    abort_release "cannot write $next"
  fi
  if [[ -e $include ]]; then
    if ! previous=$(mktemp "$dir/.$name.previous.XXXXXX") || ! cp -p "$include" "$previous"; then
      rm -f "$next" "$previous"
      abort_release "cannot back up $include"
    fi
  fi
  if ! mv -f "$next" "$include"; then
    rm -f "$next" "$previous"
    abort_release "cannot replace $include"
  fi

  if output=$("${nginx[@]}" -t 2>&1) && output=$("${nginx[@]}" -s reload 2>&1); then
    rm -f "$previous"
    log "nginx now sends traffic to port $IDLE_PORT ($include)"
    return 0
  fi
  if [[ -n $previous ]]; then
    mv -f "$previous" "$include"
  else
    rm -f "$include"
  fi
  abort_release "nginx refused the switch, $include restored: $(one_line "$output")"
}

# --- settings bundled for fleet hosts -------------------------------------------------------

# Reads nonstop.env beside this script: NONSTOP_* names only, each exported unless already
# set. Values are taken as they are, never evaluated.
load_host_env() {
  local file=$SCRIPT_DIR/nonstop.env line name value
  [[ -f $file ]] || return 0
  while IFS= read -r line || [[ -n $line ]]; do
    [[ -z $line || $line == \#* ]] && continue
    name=${line%%=*}
    value=${line#*=}
    [[ $name =~ ^NONSTOP_[A-Z0-9_]+$ && $line == *=* ]] || die "nonstop.env: expected NONSTOP_NAME=value, got '$(one_line "$line")'"
    if [[ -z ${!name+set} ]]; then
      export "$name=$value"
    fi
  done <"$file"
}

# On a fleet host (no runner set NONSTOP_APP_ENV): exports the app's env from app.env beside
# this script, then from the host's NONSTOP_ENV_FILE (its secrets; a later value wins), and
# sets NONSTOP_APP_ENV to their names. Read as NAME=value lines, never sourced.
load_app_env() {
  [[ -z ${NONSTOP_APP_ENV+set} ]] || return 0
  NONSTOP_APP_ENV=""
  read_app_env_file "$SCRIPT_DIR/app.env" optional
  if [[ -n ${NONSTOP_ENV_FILE:-} ]]; then
    read_app_env_file "$NONSTOP_ENV_FILE" required
  fi
  export NONSTOP_APP_ENV
}

# Exports the NAME=value lines of file $1 ($2: optional or required) and adds their names to
# NONSTOP_APP_ENV. An error names the line's number, never its text (it may hold a secret).
read_app_env_file() {
  local file=$1 line name number=0
  if [[ ! -r $file ]]; then
    [[ $2 == optional && ! -e $file ]] && return 0
    die "the app's env file $file cannot be read"
  fi
  while IFS= read -r line || [[ -n $line ]]; do
    number=$((number + 1))
    line=${line%$'\r'}
    [[ -z ${line//[[:space:]]/} || $line =~ ^[[:space:]]*# ]] && continue
    name=${line%%=*}
    [[ $line == *=* && $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ && $name != NONSTOP_* ]] ||
      die "$file:$number: expected NAME=value (NONSTOP_* names are nonstop's own)"
    export "$name=${line#*=}"
    NONSTOP_APP_ENV+=" $name"
  done <"$file"
}

# Fills INSTANCE_ENV with NAME=value for everything the instance may see (see the top).
instance_env() {
  local name
  INSTANCE_ENV=()
  for name in PATH HOME LANG TZ LIFECYCLE_EVENT DEPLOYMENT_ID DEPLOYMENT_GROUP_ID \
    DEPLOYMENT_GROUP_NAME APPLICATION_NAME; do
    if [[ -n ${!name+set} ]]; then
      INSTANCE_ENV+=("$name=${!name}")
    fi
  done
  while IFS= read -r name; do
    if [[ $name == NONSTOP_* && $name != NONSTOP_SWITCH_TOKEN && $name != NONSTOP_VERSION ]]; then
      INSTANCE_ENV+=("$name=${!name}")
    fi
  done < <(compgen -e)
  for name in ${NONSTOP_APP_ENV:-}; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ && $name != NONSTOP_* ]] ||
      die "NONSTOP_APP_ENV: '$(one_line "$name")' is not an app's env var name"
    if [[ -n ${!name+set} ]]; then
      INSTANCE_ENV+=("$name=${!name}")
    fi
  done
  INSTANCE_ENV+=("NONSTOP_VERSION=$1")
}

# The app's run line for the idle slot, from NONSTOP_RUN_TEMPLATE (prints it: no checks
# here, a `die` inside $(...) would be swallowed).
fill_run_template() {
  local run=$NONSTOP_RUN_TEMPLATE artifact
  # The line is read by sh: the artifact's path goes in as one single-quoted word.
  artifact=$(sh_quote "${NONSTOP_ARTIFACT:-}")
  run=${run//\{artifact\}/"$artifact"}
  run=${run//\{port\}/$IDLE_PORT}
  run=${run//\{profile\}/$IDLE_PROFILE}
  printf '%s' "$run"
}

# --- small helpers -------------------------------------------------------------------------

# Prints $1 single-quoted for sh, a ' in it written as '\''.
sh_quote() {
  local quote="'\\''"
  printf "'%s'" "${1//\'/"$quote"}"
}

log() { printf 'deploy.sh %s: %s\n' "$EVENT" "$*"; }
warn() { printf 'deploy.sh %s: %s\n' "$EVENT" "$*" >&2; }
die() {
  warn "error: $*"
  exit 1
}

usage() {
  warn "usage: LIFECYCLE_EVENT=<event> $0   (events: AfterInstall, ApplicationStart, ValidateService, ...)"
}

require_run_dir() {
  RUN_DIR=${NONSTOP_RUN_DIR:-}
  [[ -n $RUN_DIR ]] || die "NONSTOP_RUN_DIR is not set: nowhere to keep pid and log files"
}

require_number() {
  [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$(one_line "$2")'"
}

require_port() {
  if [[ ! $2 =~ ^[1-9][0-9]{0,4}$ ]] || (($2 > 65535)); then
    die "$1 must be a port number, got '$(one_line "$2")'"
  fi
}

# The version being deployed: NONSTOP_VERSION, else the bundle's VERSION file.
deploy_version() {
  local version=${NONSTOP_VERSION:-}
  if [[ -z $version && -f $SCRIPT_DIR/VERSION ]]; then
    read -r version <"$SCRIPT_DIR/VERSION" || true
  fi
  printf '%s' "${version:-dev}"
}

# Writes $2 to file $1 through a temp file and a rename: readers never see half a file.
write_atomically() {
  local tmp
  tmp=$(mktemp "$1.XXXXXX")
  printf '%s\n' "$2" >"$tmp"
  mv -f "$tmp" "$1"
}

# Sleeps $1 milliseconds (GNU and BSD sleep both take fractions of a second).
sleep_ms() {
  sleep "$(($1 / 1000)).$(printf '%03d' "$(($1 % 1000))")"
}

# Squeezes an answer from the network into one short line for the log.
one_line() {
  local text=${1//[$'\r\n\t']/ }
  if ((${#text} > 300)); then
    text="${text:0:300}..."
  fi
  printf '%s' "$text"
}

main() {
  load_host_env
  case $EVENT in
    ApplicationStop | BeforeInstall) on_nothing_to_do ;;
    AfterInstall) on_after_install ;;
    ApplicationStart) on_application_start ;;
    ValidateService) on_validate_service ;;
    "")
      usage
      exit 2
      ;;
    *) log "not a step of nonstop's blue/green: nothing to do" ;;
  esac
}

main "$@"
