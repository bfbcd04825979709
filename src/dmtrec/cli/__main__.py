from dmtrec.cli import main

raise SystemExit(main())
