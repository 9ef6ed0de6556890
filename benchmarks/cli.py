"""Command lines of the benchmark scripts, importable side by side.

Each benchmark script keeps its flags in its own `flags.FlagValues`, so one
process (a test, a notebook, a script that reuses another's helpers) can
import every benchmark module: two scripts may both define `--out` or
`--rounds`, with different defaults, and neither sees the other's. Only when
a script runs as a program are its flags added to absl's global ones, so
`--help`, `--logtostderr` and friends work as usual:

    FLAGS = flags.FlagValues()
    _ROUNDS = flags.DEFINE_integer('rounds', 8, 'Rounds.', flag_values=FLAGS)
    ...
    if __name__ == '__main__':
      cli.run(main, FLAGS)

In a test, `cli.parse(module.FLAGS, ['prog', '--rounds=2'])` sets a
script's flags from defaults (nothing of an earlier parse is kept) before
calling its `main`.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from ondevice import options


def parse(flag_values: flags.FlagValues,
          argv: Sequence[str]) -> list[str]:
  """Parses `argv` into a script's own flags, starting from their defaults.

  Args:
    flag_values: the script's `FLAGS`.
    argv: the program name, then flags.

  Returns:
    The arguments that are not flags, program name first.
  """
  flag_values.unparse_flags()
  return flag_values(list(argv))


def define_config(default: str, help_string: str,
                  flag_values: flags.FlagValues) -> flags.FlagHolder:
  """--config (an ml-collections config file) in a script's own flags.

  A `--config.<key>` naming no field is a flag error that names it
  (`options.name_unknown_overrides`), as for the experiment binaries.
  """
  holder = config_flags.DEFINE_config_file('config', default, help_string,
                                           flag_values=flag_values)
  options.name_unknown_overrides(flag_values['config'], sys.argv)
  return holder


def define_client_workload(flag_values: flags.FlagValues, *,
                           examples_per_client: int = 20,
                           batch_size: int = 5, local_steps: int = 4
                           ) -> tuple[flags.FlagHolder, flags.FlagHolder,
                                      flags.FlagHolder]:
  """--examples_per_client, --batch_size and --local_steps of a FedAvg
  benchmark (each client's data and its local loop), in one place for the
  scripts that time rounds.

  Returns:
    Their holders, in that order.
  """
  return (
      flags.DEFINE_integer('examples_per_client', examples_per_client,
                           'Examples each.', flag_values=flag_values),
      flags.DEFINE_integer('batch_size', batch_size, 'Local batch size.',
                           flag_values=flag_values),
      flags.DEFINE_integer('local_steps', local_steps,
                           'Local steps per round.', flag_values=flag_values))


def _add_to_global(flag_values: flags.FlagValues) -> None:
  """Adds a script's flags to absl's global FLAGS, under their own module.

  The defining module is kept, so `--helpshort` lists the script's flags.
  """
  flags.FLAGS.append_flag_values(flag_values)
  for module, module_flags in flag_values.flags_by_module_dict().items():
    for flag in module_flags:
      flags.FLAGS.register_flag_by_module(module, flag)
      flags.FLAGS.register_key_flag_for_module(module, flag)


def run(main: Callable[[list[str]], None],
        flag_values: flags.FlagValues) -> None:
  """`app.run(main)` for a script whose flags live in `flag_values`.

  The script's flags are parsed first, into `flag_values` (config-file flags
  define their `--config.field` overrides there as they parse); what is left
  goes to absl's global flags, which report any unknown flag.
  """
  _add_to_global(flag_values)

  def parser(argv: list[str]) -> list[str]:
    try:
      rest = flag_values(argv, known_only=True)
    except flags.Error as error:
      sys.stderr.write(f'FATAL Flags parsing error: {error}\n'
                       'Pass --helpshort or --helpfull to see help on '
                       'flags.\n')
      sys.exit(1)
    return app.parse_flags_with_usage(rest)

  app.run(main, flags_parser=parser)
