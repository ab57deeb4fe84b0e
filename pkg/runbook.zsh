#compdef runbook
# zsh completion for runbook(1): subcommands, their flags, runbook names
# (from `runbook list`), each runbook's params after -p (from `runbook
# describe`), run ids after resume and report (from `runbook history`), and
# plan files and ids after apply, show and approve.

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

_runbook_plans() {
  local dir=${RUNBOOK_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/runbook}/plans
  local -a ids
  ids=(${${(f)"$(ls $dir 2>/dev/null)"}%.json})
  _wanted plans expl 'plan id' compadd -a ids
  _files -g '*.json'
}

_runbook() {
  local curcontext=$curcontext state line expl ret=1
  typeset -A opt_args
  local -a commands globals
  commands=(
    'run:run a runbook'
    'resume:continue a failed, aborted, interrupted or killed run'
    'plan:dry-run a runbook and write the plan that apply runs'
    'apply:run a plan for real, holding each effect to it'
    'show:show a plan'
    'approve:approve a plan as a second person'
    'serve:receive Alertmanager'"'"'s webhook and plan or run runbooks by rules'
    'history:past runs, newest first'
    'report:a run'"'"'s timeline for a postmortem'
    'describe:show a runbook'"'"'s params and steps'
    'lint:load and check runbooks'
    'list:runbooks on RUNBOOK_PATH'
    'test:run busted specs inside the host'
    'version:print the version'
    'help:show the help of runbook or of a command'
  )
  # Global options: before or after the command.
  globals=(
    '(- *)'{-h,--help}'[show help]'
    '(-q --quiet)'{-v,--verbose}'[show log.debug messages]'
    '(-v --verbose)'{-q,--quiet}'[only warnings, errors, failures and the summary]'
    '--no-color[no colour and no spinner]'
    '(-o --output)'{-o,--output}'[output format]:format:(json text)'
    '--kubeconfig[Kubernetes configuration file]:file:_files'
    '--context[Kubernetes context]:context:'
    '(-n --namespace)'{-n,--namespace}'[default Kubernetes namespace]:namespace:'
  )
  # Options more than one command takes.
  local -a set_params again_params params_file step yes wait_lock undo
  set_params=('*'{-p,--param}'[set a param]:param:_runbook_params')
  again_params=('*'{-p,--param}'[give a secret param again]:param:')
  params_file=('--params-file[read params from a YAML or JSON file]:file:_files -g "*.(yaml|yml|json)"')
  step=('--step[ask before each step]')
  yes=('(-y --yes)'{-y,--yes}'[do not ask]')
  wait_lock=('--wait-lock[wait for a held lock]:duration:')
  undo=('--undo-on-failure[undo completed steps when one fails]')
  _arguments -C $globals '(- *)--version[print the version]' \
    '1:command:->command' '*::arg:->args' && ret=0
  case $state in
    command) _describe -t commands 'runbook command' commands && ret=0 ;;
    args)
      curcontext=${curcontext%:*:*}:runbook-$words[1]:
      local -a args
      case $words[1] in
        run) args=($set_params $params_file '--dry-run[change nothing, show each write]' $step $yes
          '--from[start at a step]:step:' $undo '--lock=-[hold a run lock]::key:' $wait_lock
          '--push-metrics[push the run metrics to a Pushgateway]:url:' '1:runbook:_runbook_names') ;;
        resume) args=($again_params '--force[resume although the runbook changed]'
          '--rerun-interrupted[run the interrupted step again]'
          '--on-unknown=-[effects of unknown outcome]:choice:(fail redo skip)' $yes $step $wait_lock $undo
          '1:run id:_runbook_run_ids') ;;
        plan) args=($set_params $params_file '--out[also write the plan to a file]:file:_files'
          '--require-approval[approvals the plan needs]:count:' '--alert[the alert the plan answers]:key:' '--lock=-[the run lock apply holds]::key:'
          '1:runbook:_runbook_names') ;;
        apply) args=($again_params $step $yes '1:plan:_runbook_plans') ;;
        show) args=('--format[plan format]:format:(text markdown)' '1:plan:_runbook_plans') ;;
        approve) args=('--comment[why]:text:' '--expires[how long the approval holds]:duration:'
          '1:plan:_runbook_plans') ;;
        serve) args=('--rules[the rules file]:file:_files -g "*.(yaml|yml)"' '--listen[address to listen on]:address:'
          '--token-file[the bearer token]:file:_files' '--users[the console'"'"'s people and their tokens]:file:_files'
          '--max-body[largest request body]:bytes:'
          '--max-runs[plans and runs at once]:count:') ;;
        history) args=('--runbook[only this runbook]:runbook:_runbook_names' '--limit[how many runs]:count:') ;;
        report) args=('(--html)--format[report format]:format:(markdown json html)'
          '(--format)--html[a self-contained HTML page with an SVG timeline]' '1:run id:_runbook_run_ids') ;;
        describe) args=('1:runbook:_runbook_names') ;;
        lint) args=('*:runbook:_runbook_names') ;;
        test) _files; return ;;
        help) _describe -t commands 'runbook command' commands; return ;;
      esac
      _arguments -s $globals $args && ret=0 ;;
  esac
  return ret
}

_runbook "$@"
