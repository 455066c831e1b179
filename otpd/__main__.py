from otpd.app.cli import main

raise SystemExit(main())
