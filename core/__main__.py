from dafar.cli import main

raise SystemExit(main())
