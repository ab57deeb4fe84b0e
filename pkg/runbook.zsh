#compdef runbook
# zsh completion for runbook(1): subcommands, their flags, runbook names
# (from `runbook list`), each runbook's params after -p (from `runbook
# describe`), and run ids after resume and report (from `runbook history`).

_runbook_names() {
  local -a names
  names=(${(f)"$(runbook list 2>/dev/null | awk '{ print $1 }')"})
  _wanted runbooks expl 'runbook' compadd -a names
  _files -g '*.lua'
}

_runbook_params() {
  local rb=${line[1]}
  local -a params
  [[ -n $rb ]] || return 1
  params=(${(f)"$(runbook describe $rb 2>/dev/null |
    awk '/^Params:/ { p = 1; next } /^[^ ]/ { p = 0 } p && /^  [^ ]/ { print $1 }')"})
  compset -P '*=' && return 1
  _wanted params expl 'param' compadd -S = -a params
}

_runbook_run_ids() {
  local -a ids
  ids=(${(f)"$(runbook history --limit 50 2>/dev/null | awk 'NR > 1 && $1 !~ /^\(/ { print $1 }')"})
  _wanted runs expl 'run id' compadd -a ids
}

_runbook() {
  local curcontext=$curcontext state line expl
  local -a commands run_flags
  commands=(
    'run:run a runbook'
    'resume:continue a failed, aborted, interrupted or killed run'
    'history:past runs, newest first'
    'report:a run'"'"'s timeline for a postmortem'
    'describe:show a runbook'"'"'s params and steps'
    'lint:load and check runbooks'
    'list:runbooks on RUNBOOK_PATH'
    'test:run busted specs inside the host'
    'version:print the version'
    'help:print the usage'
  )
  if (( CURRENT == 2 )); then
    _describe -t commands 'runbook command' commands
    return
  fi
  local cmd=$words[2]
  shift words; (( CURRENT-- ))
  curcontext=${curcontext%:*:*}:runbook-$cmd:
  case $cmd in
    run)
      _arguments -s \
        '*'{-p,--param}'[set a param]:param:_runbook_params' \
        '--params-file[read params from a YAML or JSON file]:file:_files -g "*.(yaml|yml|json)"' \
        '--dry-run[change nothing, show each write]' \
        '--step[ask before each step]' \
        '(-y --yes)'{-y,--yes}'[run unattended]' \
        '--output[output format]:format:(json text)' \
        '--from[start at a step]:step:' \
        '--undo-on-failure[undo completed steps when one fails]' \
        '--lock=-[hold a run lock]::key:' \
        '--wait-lock[wait for a held lock]:duration:' \
        '--help[print usage]' \
        '1:runbook:_runbook_names' ;;
    resume)
      _arguments -s \
        '*-p[give a secret param again]:param:' \
        '--force[resume although the runbook changed]' \
        '--rerun-interrupted[run the interrupted step again]' \
        '--on-unknown=-[effects of unknown outcome]:choice:(fail redo skip)' \
        '(-y --yes)'{-y,--yes}'[run unattended]' \
        '--step[ask before each step]' \
        '--output[output format]:format:(json text)' \
        '--wait-lock[wait for a held lock]:duration:' \
        '--undo-on-failure[undo completed steps when one fails]' \
        '--help[print usage]' \
        '1:run id:_runbook_run_ids' ;;
    history)
      _arguments \
        '--runbook[only this runbook]:runbook:_runbook_names' \
        '--limit[how many runs]:count:' \
        '--output[output format]:format:(json text)' \
        '--help[print usage]' ;;
    report)
      _arguments \
        '--format[report format]:format:(markdown json)' \
        '--help[print usage]' \
        '1:run id:_runbook_run_ids' ;;
    describe) _arguments '--help[print usage]' '1:runbook:_runbook_names' ;;
    lint) _arguments '--help[print usage]' '*:runbook:_runbook_names' ;;
    test) _arguments '--help[print usage]' '*:spec:_files' ;;
    help) _describe -t commands 'runbook command' commands ;;
  esac
}

_runbook "$@"
