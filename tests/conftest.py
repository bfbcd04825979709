"""Test-wide setup: quiet library noise in this process and in spawned workers."""

from dmtrec.parallel.launch import quiet_libraries

quiet_libraries()
