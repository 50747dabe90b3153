/*
 * The native launcher's entry (no libc, no start files): the kernel's
 * initial stack (argc, argv, envp, auxv) goes to launcher_main.
 */
	.text
	.globl _start
	.type _start, @function
_start:
	mov	%rsp, %rdi
	and	$-16, %rsp
	xor	%ebp, %ebp
	call	launcher_main		/* noreturn */
	ud2
	.size _start, . - _start
	.section .note.GNU-stack, "", @progbits
