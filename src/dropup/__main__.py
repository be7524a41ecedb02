from dropup.cli import main

raise SystemExit(main())
