# bash completion for runbook(1): subcommands, their flags, runbook names
# (from `runbook list`), each runbook's params after -p (from `runbook
# describe`), run ids after resume and report (from `runbook history`), and
# plan files and ids after apply, show and approve.

_runbook_names()
{
    runbook list 2>/dev/null | awk '{ print $1 }'
}

# The params of the runbook named on the command line, as "name=".
_runbook_params()
{
    runbook describe "$1" 2>/dev/null |
        awk '/^Params:/ { p = 1; next } /^[^ ]/ { p = 0 } p && /^  [^ ]/ { print $1 "=" }'
}

_runbook_run_ids()
{
    runbook history --limit 50 2>/dev/null | awk 'NR > 1 && $1 !~ /^\(/ { print $1 }'
}

# The ids of the plans in the state directory.
_runbook_plan_ids()
{
    local dir=${RUNBOOK_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/runbook}/plans
    ls "$dir" 2>/dev/null | sed -n 's/\.json$//p'
}

_runbook()
{
    local cur prev words cword
    _init_completion -n = || return

    local commands="run resume plan apply show approve serve history report describe lint list test version help"
    local globals="-h --help --version -v --verbose -q --quiet --no-color -o --output --kubeconfig --context -n --namespace"
    # The command: the first word that is no option and no global option's value.
    local cmd="" at i
    for ((at = 1; at < cword; at++)); do
        case ${words[at]} in
            -o | --output | --kubeconfig | --context | -n | --namespace) ((at++)) ;;
            -*) ;;
            *) cmd=${words[at]}; break ;;
        esac
    done

    case $prev in
        -o | --output) COMPREPLY=($(compgen -W "json text" -- "$cur")); return ;;
        --kubeconfig) _filedir; return ;;
        --context | -n | --namespace) return ;;
    esac
    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "$globals" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$commands" -- "$cur"))
        fi
        return
    fi

    local flags target=""
    case $cmd in
        run) flags="-p --param --params-file --dry-run --step --yes -y --from --undo-on-failure --lock --wait-lock --push-metrics" ;;
        resume) flags="-p --param --force --rerun-interrupted --on-unknown --yes -y --step --wait-lock --undo-on-failure" ;;
        plan) flags="-p --param --params-file --out --require-approval --alert --lock" ;;
        apply) flags="-p --param --step --yes -y" ;;
        show) flags="--format" ;;
        approve) flags="--comment --expires" ;;
        serve) flags="--rules --listen --token-file --users --max-body --max-runs" ;;
        history) flags="--runbook --limit" ;;
        report) flags="--format --html" ;;
        help) COMPREPLY=($(compgen -W "$commands" -- "$cur")); return ;;
    esac
    flags="$flags $globals"
    # The runbook named so far: the first word after the command that is no option or option value.
    for ((i = at + 1; i < cword; i++)); do
        case ${words[i]} in
            -p | --param | --params-file | -o | --output | --from | --wait-lock | --runbook | --limit | --format | \
                --out | --require-approval | --alert | --comment | --expires | --rules | --listen | --token-file | --users | \
                --max-body | --max-runs | \
                --kubeconfig | --context | -n | --namespace) ((i++)) ;;
            -*) ;;
            *) target=${words[i]}; break ;;
        esac
    done

    case $prev in
        -p | --param)
            [[ -n $target && ($cmd == run || $cmd == plan) ]] || return
            compopt -o nospace
            COMPREPLY=($(compgen -W "$(_runbook_params "$target")" -- "$cur"))
            return ;;
        --params-file) _filedir '@(yaml|yml|json)'; return ;;
        --format)
            if [[ $cmd == show ]]; then COMPREPLY=($(compgen -W "text markdown" -- "$cur"))
            else COMPREPLY=($(compgen -W "markdown json html" -- "$cur")); fi
            return ;;
        --out | --rules | --token-file | --users) _filedir; return ;;
        --require-approval | --alert | --comment | --expires | --listen | --max-body | --max-runs) return ;;
        --runbook) COMPREPLY=($(compgen -W "$(_runbook_names)" -- "$cur")); return ;;
        --from | --wait-lock | --limit) return ;;
    esac

    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return
    fi
    case $cmd in
        run | plan | describe | lint)
            [[ $cmd != lint && -n $target ]] && return
            COMPREPLY=($(compgen -W "$(_runbook_names)" -- "$cur"))
            _filedir lua ;;
        resume | report) [[ -z $target ]] && COMPREPLY=($(compgen -W "$(_runbook_run_ids)" -- "$cur")) ;;
        apply | show | approve)
            [[ -n $target ]] && return
            COMPREPLY=($(compgen -W "$(_runbook_plan_ids)" -- "$cur"))
            _filedir json ;;
        test) _filedir ;;
    esac
} &&
    complete -F _runbook runbook
